"""The topic the request notifications go to: CloudEvents 1.0 in, Entra ID only
(local auth off), public and tagged like the rest, its endpoint the function
app's SOC_NOTIFY_TOPIC_ENDPOINT and a deployment output. The identity's
EventGrid Data Sender role on it is checked with the other roles
(test_identity.py), the outbox alert with the other alerts (test_alerts.py).
Each check is also run on a broken copy to show it fails."""

import pytest

from conftest import replace_once
from infra_model import app_settings, notify_problems, notify_topic

TOPIC = ("modules", "eventgrid.bicep")
APP = ("modules", "functionapp.bicep")
MAIN = ("main.bicep",)


def test_the_topic_takes_cloudevents_with_entra_id_only_and_feeds_the_app_setting():
    assert notify_problems() == []
    props = notify_topic()["properties"]
    assert props["inputSchema"] == "CloudEventSchemaV1_0"
    assert props["disableLocalAuth"] is True
    assert app_settings()["SOC_NOTIFY_TOPIC_ENDPOINT"] == "notifyTopicEndpoint"


@pytest.mark.parametrize(
    "path,old,new,expected",
    [
        (TOPIC, "inputSchema: 'CloudEventSchemaV1_0'", "inputSchema: 'EventGridSchema'", "inputSchema"),
        (TOPIC, "    disableLocalAuth: true\n", "", "disableLocalAuth"),
        (TOPIC, "publicNetworkAccess: 'Enabled'", "publicNetworkAccess: 'Disabled'", "publicNetworkAccess"),
        (TOPIC, "  tags: tags\n", "", "common tags"),
        (TOPIC, "output endpoint string = topic.properties.endpoint",
         "output endpoint string = 'https://example.invalid/api/events'", "does not output the topic's endpoint"),
        (APP, "  SOC_NOTIFY_TOPIC_ENDPOINT: notifyTopicEndpoint\n", "", "SOC_NOTIFY_TOPIC_ENDPOINT is not set"),
        (APP, "  SOC_NOTIFY_TOPIC_KEY: ''\n", "  SOC_NOTIFY_TOPIC_KEY: 'k'\n", "SOC_NOTIFY_TOPIC_KEY is set"),
        (MAIN, "    notifyTopicEndpoint: eventGrid.outputs.endpoint\n",
         "    notifyTopicEndpoint: 'https://example.invalid/api/events'\n", "notifyTopicEndpoint is not"),
        (MAIN, "output notifyTopicEndpoint string = eventGrid.outputs.endpoint\n", "", "no output of the topic's endpoint"),
        (MAIN, "output notifyTopicName string = eventGrid.outputs.topicName\n", "", "no output of the topic's topicName"),
    ],
)
def test_the_topic_check_fails_on_a_broken_copy(infra_copy, path, old, new, expected):
    replace_once(infra_copy.joinpath(*path), old, new)
    problems = notify_problems(infra_copy)
    assert any(expected in p for p in problems), problems
