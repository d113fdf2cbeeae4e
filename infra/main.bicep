// SoC settings service: everything one environment (qa or prod) needs, in one
// resource group. Deploy with
//   az deployment group create -g <rg> -f infra/main.bicep \
//     -p infra/params/<env>.parameters.json -p deviceApiKey=<key>
// (docs/deploy.md walks through it).
//
// Order, encoded by the data flow between modules: serviceBus, keyVault,
// storage, monitoring and eventGrid deploy in parallel; identity takes their outputs (it
// creates the app's user-assigned identity and grants its roles on them);
// functionApp takes the identity's outputs, so the site is created only once
// its identity holds every role; alerts take the app's outputs. No module
// passes a key: every Azure connection is identity-based.

targetScope = 'resourceGroup'

@description('Environment name; part of every resource name.')
@allowed([
  'qa'
  'prod'
])
param environmentName string

@description('Azure region for all resources. Must offer the Flex Consumption plan when hostingPlan is FlexConsumption (az functionapp list-flexconsumption-locations).')
param location string = resourceGroup().location

@description('Short lowercase name used in resource names (letters and digits).')
@minLength(3)
@maxLength(8)
param baseName string = 'socset'

@description('FlexConsumption (default) or Dedicated; see docs/deploy.md for why.')
@allowed([
  'FlexConsumption'
  'Dedicated'
])
param hostingPlan string = 'FlexConsumption'

@description('Base URL of the vendor device cloud API (DEVICE_API_BASE_URL).')
param deviceApiBaseUrl string

@description('x-api-key for the device cloud API. Stored in Key Vault; never put it in a parameter file.')
@secure()
param deviceApiKey string

@description('Queue carrying pending settings (SOC_QUEUE_NAME).')
param queueName string = 'soc-settings'

@description('Ledger table (SOC_STATE_TABLE).')
param ledgerTableName string = 'socsettings'

@description('How long a request may wait for its device (SOC_REQUEST_TTL_SECONDS). 7 days.')
@minValue(60)
@maxValue(1209600)
param requestTtlSeconds int = 604800

@description('Queue default message TTL, ISO 8601. Must be at least requestTtlSeconds (infra/tests check it).')
param queueMessageTimeToLive string = 'P14D'

@description('Deliveries before a message the handler keeps failing is dead-lettered.')
@minValue(3)
@maxValue(100)
param queueMaxDeliveryCount int = 10

@description('Peek-lock duration of the queue, ISO 8601 (at most PT5M).')
param queueLockDuration string = 'PT1M'

@description('Duplicate detection history window, ISO 8601.')
param queueDuplicateDetectionWindow string = 'PT10M'

@description('DEVICE_API_TIMEOUT_MS')
param deviceApiTimeoutMs int = 5000

@description('SOC_RECHECK_INITIAL_SECONDS')
param recheckInitialSeconds int = 60

@description('SOC_RECHECK_MAX_SECONDS')
param recheckMaxSeconds int = 1800

@description('Minutes between two DrainSocTimer sweeps (DRAIN_SOC_SCHEDULE); the sweep alert fires after three missed sweeps.')
@minValue(1)
@maxValue(30)
param drainIntervalMinutes int = 5

@description('DRAIN_SOC_CONCURRENCY')
param drainConcurrency int = 16

@description('DRAIN_SOC_MAX_DUE: due devices one sweep takes from the due index at most.')
param drainMaxDue int = 20000

@description('DRAIN_SOC_FANOUT_ABOVE: above this many due devices the sweep fans out over Service Bus.')
param drainFanoutAbove int = 100

@description('DEVICE_API_MAX_CALLS_PER_SECOND: the vendor\'s ceiling on device calls per second, all instances together; each gets ceiling / maximumInstanceCount (DEVICE_API_INSTANCES). Keep ceiling * 30 >= maximumInstanceCount, or the handler reports its configuration invalid.')
@minValue(1)
param deviceApiMaxCallsPerSecond int = 50

@description('Flex Consumption: most instances the app scales out to; also DEVICE_API_INSTANCES, the share of the device-call ceiling each instance gets.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Storage redundancy.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param storageSku string = 'Standard_LRS'

@description('Days deleted Key Vault objects stay recoverable.')
param keyVaultSoftDeleteDays int = 90

@description('Log Analytics retention in days.')
param logRetentionDays int = 30

@description('E-mail address the alerts notify; empty: alerts fire without a notification.')
param alertEmail string = ''

var drainSchedule = '0 */${drainIntervalMinutes} * * * *'
var suffix = uniqueString(resourceGroup().id, environmentName)
var compactBase = toLower(baseName)
var tags = {
  service: 'soc-settings'
  environment: environmentName
}

module serviceBus 'modules/servicebus.bicep' = {
  name: 'servicebus'
  params: {
    location: location
    namespaceName: 'sb-${baseName}-${environmentName}-${suffix}'
    queueName: queueName
    messageTimeToLive: queueMessageTimeToLive
    maxDeliveryCount: queueMaxDeliveryCount
    lockDuration: queueLockDuration
    duplicateDetectionWindow: queueDuplicateDetectionWindow
    tags: tags
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    location: location
    vaultName: take('kv${compactBase}${environmentName}${suffix}', 24)
    deviceApiKey: deviceApiKey
    softDeleteRetentionDays: keyVaultSoftDeleteDays
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    location: location
    accountName: take('st${compactBase}${environmentName}${suffix}', 24)
    ledgerTableName: ledgerTableName
    deploymentContainerName: 'app-package'
    skuName: storageSku
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    location: location
    workspaceName: 'log-${baseName}-${environmentName}-${suffix}'
    appInsightsName: 'appi-${baseName}-${environmentName}-${suffix}'
    retentionDays: logRetentionDays
    tags: tags
  }
}

// The topic the request notifications are published to.
module eventGrid 'modules/eventgrid.bicep' = {
  name: 'eventgrid'
  params: {
    location: location
    topicName: 'evgt-${baseName}-${environmentName}-${suffix}'
    tags: tags
  }
}

// The app's identity and its roles, before the app exists (docs/deploy.md).
module identity 'modules/identity.bicep' = {
  name: 'identity'
  params: {
    location: location
    identityName: 'id-${baseName}-${environmentName}-${suffix}'
    storageAccountName: storage.outputs.accountName
    serviceBusNamespaceName: serviceBus.outputs.namespaceName
    queueName: serviceBus.outputs.queueName
    keyVaultName: keyVault.outputs.vaultName
    deviceApiKeySecretName: keyVault.outputs.deviceApiKeySecretName
    appInsightsName: monitoring.outputs.appInsightsName
    eventGridTopicName: eventGrid.outputs.topicName
    tags: tags
  }
}

// Takes the other modules' outputs, the identity's included, so it is
// deployed after them: after every role assignment exists.
module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  params: {
    location: location
    appName: 'func-${baseName}-${environmentName}-${suffix}'
    planName: 'plan-${baseName}-${environmentName}-${suffix}'
    hostingPlan: hostingPlan
    storageAccountName: storage.outputs.accountName
    deploymentContainerName: storage.outputs.deploymentContainerName
    appInsightsName: monitoring.outputs.appInsightsName
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    deviceApiKeySecretUri: keyVault.outputs.deviceApiKeySecretUri
    serviceBusFullyQualifiedNamespace: serviceBus.outputs.fullyQualifiedNamespace
    queueName: serviceBus.outputs.queueName
    ledgerTableName: storage.outputs.ledgerTableName
    deviceApiBaseUrl: deviceApiBaseUrl
    deviceApiTimeoutMs: deviceApiTimeoutMs
    requestTtlSeconds: requestTtlSeconds
    recheckInitialSeconds: recheckInitialSeconds
    recheckMaxSeconds: recheckMaxSeconds
    drainSchedule: drainSchedule
    drainConcurrency: drainConcurrency
    drainMaxDue: drainMaxDue
    drainFanoutAbove: drainFanoutAbove
    deviceApiMaxCallsPerSecond: deviceApiMaxCallsPerSecond
    maximumInstanceCount: maximumInstanceCount
    notifyTopicEndpoint: eventGrid.outputs.endpoint
    tags: tags
  }
}

// Alerts and the operators' workbook (docs/operations.md).
module alerts 'modules/alerts.bicep' = {
  name: 'alerts'
  params: {
    location: location
    namePrefix: '${baseName}-${environmentName}'
    appInsightsName: functionApp.outputs.appInsightsName
    serviceBusNamespaceName: serviceBus.outputs.namespaceName
    queueName: serviceBus.outputs.queueName
    drainIntervalMinutes: drainIntervalMinutes
    alertEmail: alertEmail
    tags: tags
  }
}

output functionAppName string = functionApp.outputs.appName
output defaultHostname string = functionApp.outputs.defaultHostname
output queueName string = serviceBus.outputs.queueName
output keyVaultName string = keyVault.outputs.vaultName
output serviceBusNamespace string = serviceBus.outputs.namespaceName
// Where the request notifications go: subscribe to this topic to receive them.
output notifyTopicName string = eventGrid.outputs.topicName
output notifyTopicEndpoint string = eventGrid.outputs.endpoint
// CI and docs/deploy.md read these instead of computing names.
output identityPrincipalId string = identity.outputs.principalId
output identityClientId string = identity.outputs.clientId
