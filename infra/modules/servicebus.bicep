// Service Bus for the SoC settings service: a Standard namespace (duplicate
// detection and scheduled messages need Standard or Premium) and the settings
// queue. Local (SAS) authentication is off: the function app's identity gets
// an Entra ID data role on the queue (identity-roles.bicep), and no shared
// access rule or connection string exists anywhere.

@description('Azure region.')
param location string

@description('Service Bus namespace name (6-50 characters).')
param namespaceName string

@description('Queue that carries pending settings (app setting SOC_QUEUE_NAME).')
param queueName string

@description('Default time to live of a queued message, ISO 8601. Must not be shorter than SOC_REQUEST_TTL_SECONDS: the handler gives every message its own, shorter TTL.')
param messageTimeToLive string

@description('Deliveries before the broker dead-letters a message the handler keeps failing.')
@minValue(1)
param maxDeliveryCount int

@description('Peek-lock duration, ISO 8601 (at most PT5M). The Functions host renews the lock while the handler works.')
param lockDuration string

@description('How long Service Bus remembers MessageIds for duplicate detection, ISO 8601.')
param duplicateDetectionWindow string

param tags object = {}

resource namespace 'Microsoft.ServiceBus/namespaces@2024-01-01' = {
  name: namespaceName
  location: location
  tags: tags
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    minimumTlsVersion: '1.2'
    // Entra ID only: the trigger and the handler's REST sends use the app's
    // managed identity, so shared access keys are switched off.
    disableLocalAuth: true
    publicNetworkAccess: 'Enabled'
  }
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = {
  parent: namespace
  name: queueName
  properties: {
    deadLetteringOnMessageExpiration: true
    maxDeliveryCount: maxDeliveryCount
    lockDuration: lockDuration
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: duplicateDetectionWindow
    defaultMessageTimeToLive: messageTimeToLive
    requiresSession: false
    enablePartitioning: false
    maxSizeInMegabytes: 1024
  }
}

output namespaceName string = namespace.name
output queueName string = queue.name
// Host name only (`<ns>.servicebus.windows.net`), the form
// ServiceBusConnection__fullyQualifiedNamespace takes.
output fullyQualifiedNamespace string = replace(replace(namespace.properties.serviceBusEndpoint, 'https://', ''), ':443/', '')
