// The Event Grid topic the function app publishes its request notifications
// to: every final transition of a request (applied, superseded, expired,
// failed, cancelled) as a CloudEvent 1.0 (SOC_NOTIFY_TOPIC_ENDPOINT). Local
// (access key and SAS) authentication is off: the app publishes with its
// user-assigned identity, which holds EventGrid Data Sender on this topic
// (identity-roles.bicep). Subscribers (the company's backend, a queue, ...)
// are added by whoever consumes the events; this template creates none.

@description('Azure region.')
param location string

@description('Event Grid topic name (3-50 characters: letters, digits, hyphens).')
param topicName string

param tags object = {}

resource topic 'Microsoft.EventGrid/topics@2025-02-15' = {
  // checkov:skip=CKV_AZURE_193: no virtual network in this design; the function app publishes over the topic's public endpoint with Entra ID only (local auth off, TLS 1.2), like storage and Service Bus
  // checkov:skip=CKV_AZURE_191: the topic's own identity is for delivering to destinations that need one; this template creates no subscription (consumers add theirs, and the identity with them if they need it)
  name: topicName
  location: location
  tags: tags
  properties: {
    // Structured-mode CloudEvents 1.0, what the handler publishes.
    inputSchema: 'CloudEventSchemaV1_0'
    // Entra ID only: no aeg-sas-key or SAS token is accepted.
    disableLocalAuth: true
    minimumTlsVersionAllowed: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

output topicName string = topic.name
// https://<topic>.<region>-1.eventgrid.azure.net/api/events: where the app publishes.
output endpoint string = topic.properties.endpoint
