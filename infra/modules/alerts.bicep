// What an operator is told, and where they look first: five Azure Monitor
// alerts and one workbook. docs/operations.md explains each and repeats the
// queries for the Logs blade.
//
// The log queries read the handler's stdout lines, which the Functions host
// records in the Application Insights `traces` table: `key=value` fields after
// the message (` device=`, ` request_id=`, ` outcome=`, ` last_error=` last on
// the line) and the level as a word (` ERROR `). infra/tests check that the
// handler's log fields and these queries agree.
//
// Sampling: host.json excludes Request, Exception and Trace items from
// Application Insights sampling, so every `requests` and `traces` row is kept
// (the pending view's latest state per device and the distinct counts rely on
// it). Counts still add `itemCount` (the number of items a kept row stands
// for; 1 when unsampled), never count rows, so they stay right if sampling
// ever reaches these tables. infra/tests hold host.json, these queries and
// docs/operations.md together.

@description('Azure region of the log alerts and the workbook.')
param location string

@description('Prefix of every alert name, e.g. socset-prod.')
param namePrefix string

param appInsightsName string
param serviceBusNamespaceName string
param queueName string

@description('Minutes between two DrainSocTimer sweeps; the sweep alert fires when three in a row are missing.')
@minValue(1)
param drainIntervalMinutes int

@description('E-mail address notified by every alert; empty: no action group.')
param alertEmail string = ''

@description('Failed-or-expired share of the requests settled in an hour, in percent, above which the rate alert fires.')
@minValue(1)
@maxValue(100)
param failedOrExpiredPercent int = 20

@description('Settled requests an hour needs before the rate alert judges it (a handful of failures in a quiet hour is not a trend).')
@minValue(1)
param minimumSettledRequests int = 5

@description('Failed queue/timer invocations (or 5xx HTTP answers) in 15 minutes above which the handler-error alert fires. Transient device errors fail queue invocations on purpose.')
@minValue(0)
param failedInvocationThreshold int = 10

@description('Age in seconds of the oldest request notification not yet published to the Event Grid topic above which the outbox alert fires (DrainSocTimer logs it every run).')
@minValue(60)
param outboxAgeThresholdSeconds int = 900

param tags object = {}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource serviceBusNamespace 'Microsoft.ServiceBus/namespaces@2024-01-01' existing = {
  name: serviceBusNamespaceName
}

var sweepWindowMinutes = 3 * drainIntervalMinutes

// Field extraction shared by the log queries (a leading space anchors each key).
var socFields = 'extend deviceId = extract(" device=([^ ]+)", 1, message), requestId = extract(" request_id=([^ ]+)", 1, message), outcome = extract(" outcome=([a-z]+)", 1, message)'

var failedOrExpiredQuery = 'traces | where message contains " outcome=" | ${socFields} | where outcome in ("applied", "failed", "expired") | summarize settled = dcount(requestId), failedOrExpired = dcountif(requestId, outcome != "applied") | where settled >= ${minimumSettledRequests} and failedOrExpired * 100 > settled * ${failedOrExpiredPercent}'

var handlerErrorsQuery = 'union (traces | where message contains_cs " ERROR " | extend kind = "errorLine"), (requests | where name in ("SetSocHttp", "SocQueueTrigger", "DrainSocTimer", "DeviceEventsHttp") | where (name in ("SetSocHttp", "DeviceEventsHttp") and toint(resultCode) >= 500) or (name !in ("SetSocHttp", "DeviceEventsHttp") and success == false) | extend kind = "failedInvocation") | summarize errorLines = sumif(itemCount, kind == "errorLine"), failedInvocations = sumif(itemCount, kind == "failedInvocation") | where errorLines > 0 or failedInvocations > ${failedInvocationThreshold}'

var sweepMissingQuery = 'requests | where name == "DrainSocTimer" and success == true | summarize sweeps = sum(itemCount) | where sweeps == 0'

// Every DrainSocTimer run logs ` outbox_oldest_age_s=<s> outbox_events=<n>`: the
// oldest notification not yet accepted by the topic, and how many wait (0 0: none).
var outboxAgeQuery = 'traces | where message contains " outbox_oldest_age_s=" | extend oldestAgeSeconds = toint(extract(" outbox_oldest_age_s=([0-9]+)", 1, message)), waiting = toint(extract(" outbox_events=([0-9]+)", 1, message)) | summarize maxAgeSeconds = max(oldestAgeSeconds), maxWaiting = max(waiting) | where maxAgeSeconds > ${outboxAgeThresholdSeconds}'

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: '${namePrefix}-oncall'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'soc-oncall'
    enabled: true
    emailReceivers: [
      {
        name: 'oncall'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var actionGroupIds = empty(alertEmail) ? [] : [
  actionGroup.id
]

// A dead-lettered message is a request the handler gave up on (max delivery
// count or expiry); the sweep re-sends it, but it should never be routine.
resource deadLetteredAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: '${namePrefix}-dead-lettered'
  location: 'global'
  tags: tags
  properties: {
    description: 'The settings queue holds dead-lettered messages (docs/operations.md: dead-lettered messages).'
    severity: 2
    enabled: true
    scopes: [
      serviceBusNamespace.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'DeadLetteredMessages'
          metricNamespace: 'Microsoft.ServiceBus/namespaces'
          metricName: 'DeadletteredMessages'
          dimensions: [
            {
              name: 'EntityName'
              operator: 'Include'
              values: [
                queueName
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Maximum'
        }
      ]
    }
    actions: [for id in actionGroupIds: {
      actionGroupId: id
    }]
  }
}

// Requests ending `failed` or `expired` instead of `applied`, as a share of
// those settled in the last hour.
resource failedOrExpiredAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-failed-or-expired-rate'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: failed or expired requests'
    description: 'More than ${failedOrExpiredPercent}% of the requests settled in the last hour ended failed or expired (docs/operations.md: what failed and why).'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    // The component may be minutes old on a first deployment; without this
    // the rule's creation can fail validating its query against it.
    skipQueryValidation: true
    evaluationFrequency: 'PT15M'
    windowSize: 'PT1H'
    autoMitigate: true
    criteria: {
      allOf: [
        {
          query: failedOrExpiredQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

// ERROR lines from the handler, or more failed invocations than transient
// device errors explain.
resource handlerErrorsAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-handler-errors'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: handler errors'
    description: 'The handler logged an ERROR line, or more than ${failedInvocationThreshold} invocations failed in 15 minutes (docs/operations.md: handler errors).'
    severity: 1
    enabled: true
    scopes: [
      appInsights.id
    ]
    // The component may be minutes old on a first deployment; without this
    // the rule's creation can fail validating its query against it.
    skipQueryValidation: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      allOf: [
        {
          query: handlerErrorsQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

// Nothing is applied to returning devices, expired or re-sent while the sweep
// does not run: three missed schedules in a row is an incident.
resource sweepMissingAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-sweep-missing'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: DrainSocTimer has not run'
    description: 'No successful DrainSocTimer run in ${sweepWindowMinutes} minutes, three schedules (docs/operations.md: the sweep is not running).'
    severity: 1
    enabled: true
    scopes: [
      appInsights.id
    ]
    // The component may be minutes old on a first deployment; without this
    // the rule's creation can fail validating its query against it.
    skipQueryValidation: true
    evaluationFrequency: 'PT${drainIntervalMinutes}M'
    windowSize: 'PT${sweepWindowMinutes}M'
    autoMitigate: true
    criteria: {
      allOf: [
        {
          query: sweepMissingQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

// Request notifications are not reaching the Event Grid topic: the oldest
// waiting one is older than the threshold (the topic refuses them, the
// identity lacks its role, or the topic is unreachable).
resource outboxAgeAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-outbox-age'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${namePrefix}: notifications not published'
    description: 'A request notification has waited more than ${outboxAgeThresholdSeconds} s to be published to the Event Grid topic (docs/operations.md: notifications not published).'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    // The component may be minutes old on a first deployment; without this
    // the rule's creation can fail validating its query against it.
    skipQueryValidation: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      allOf: [
        {
          query: outboxAgeQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

// The operators' view: the three questions docs/operations.md starts with.
var pendingQuery = 'traces | where message contains " outcome=" | ${socFields} | summarize arg_max(timestamp, outcome, requestId) by deviceId | where outcome == "pending" | project deviceId, requestId, lastChange = timestamp | order by lastChange asc'
var failedQuery = 'traces | where message contains " outcome=" | ${socFields} | where outcome in ("failed", "expired") | extend lastError = extract(" last_error=(.*)$", 1, message) | summarize arg_max(timestamp, outcome, lastError) by requestId, deviceId | order by timestamp desc'
var deviceHistoryQuery = 'traces | ${socFields} | where deviceId == "{DeviceId}" | project timestamp, requestId, outcome, line = message | order by timestamp asc'

var workbookContent = {
  version: 'Notebook/1.0'
  items: [
    {
      type: 1
      content: {
        json: '## SoC settings: on-call view\nPending requests, what failed and why, and one device\'s history. docs/operations.md explains each query.'
      }
    }
    {
      type: 9
      content: {
        version: 'KqlParameterItem/1.0'
        parameters: [
          {
            id: 'b1c9a0f4-3f7e-4c43-9f1e-2f3f4d3a9a11'
            version: 'KqlParameterItem/1.0'
            name: 'DeviceId'
            label: 'Device id'
            type: 1
            timeContext: {
              durationMs: 604800000
            }
          }
        ]
      }
    }
    {
      type: 3
      content: {
        version: 'KqlItem/1.0'
        title: 'Pending requests (latest state per device)'
        query: pendingQuery
        queryType: 0
        resourceType: 'microsoft.insights/components'
        timeContext: {
          durationMs: 1209600000
        }
      }
    }
    {
      type: 3
      content: {
        version: 'KqlItem/1.0'
        title: 'Failed and expired requests, with the reason'
        query: failedQuery
        queryType: 0
        resourceType: 'microsoft.insights/components'
        timeContext: {
          durationMs: 604800000
        }
      }
    }
    {
      type: 3
      content: {
        version: 'KqlItem/1.0'
        title: 'History of the device above'
        query: deviceHistoryQuery
        queryType: 0
        resourceType: 'microsoft.insights/components'
        timeContext: {
          durationMs: 1209600000
        }
      }
    }
  ]
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, namePrefix, 'soc-oncall-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: '${namePrefix}: SoC settings on-call'
    category: 'workbook'
    sourceId: appInsights.id
    serializedData: string(workbookContent)
  }
}

output alertNames array = [
  deadLetteredAlert.name
  failedOrExpiredAlert.name
  handlerErrorsAlert.name
  sweepMissingAlert.name
  outboxAgeAlert.name
]
