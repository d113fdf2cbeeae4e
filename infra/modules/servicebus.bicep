// Service Bus for the SoC settings service: a Standard namespace (duplicate
// detection and scheduled messages need Standard or Premium), the settings
// queue and one send/listen rule whose connection string the Key Vault module
// stores. Deployed first: the Key Vault module reads this module's outputs,
// which is what makes Azure Resource Manager deploy it afterwards.

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

var ruleName = 'soc-handler-send-listen'

resource namespace 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' = {
  name: namespaceName
  location: location
  tags: tags
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    minimumTlsVersion: '1.2'
    // The handler authenticates with a SAS connection string (the REST client
    // in azure_messaging_servicebus 0.21 signs SAS tokens), so local auth stays on.
    disableLocalAuth: false
    publicNetworkAccess: 'Enabled'
  }
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2022-10-01-preview' = {
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

// Send (HTTP function, drain timer) and Listen (queue trigger); no Manage.
resource handlerRule 'Microsoft.ServiceBus/namespaces/authorizationRules@2022-10-01-preview' = {
  parent: namespace
  name: ruleName
  properties: {
    rights: [
      'Send'
      'Listen'
    ]
  }
}

output namespaceName string = namespace.name
output queueName string = queue.name
// The rule's name, not its keys: the Key Vault module calls listKeys itself so
// that no secret ever appears in deployment outputs.
output authorizationRuleName string = handlerRule.name
