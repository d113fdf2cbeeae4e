// The function app: Linux, custom handler (the Rust binary `handler`), run
// as the user-assigned identity of identity.bicep (created and granted its
// roles before this module runs), and every app setting the handler reads.
//
// The app settings the code reads are listed once, in src/config.rs
// (config::SETTINGS). tests/infra_settings.rs fails when `socSettings` below
// misses one of them or sets a SOC_/DEVICE_/DRAIN_ setting the code does not know.

@description('Azure region.')
param location string

param appName string
param planName string

@description('FlexConsumption (default, serverless) or Dedicated (an App Service plan; the fallback if Flex Consumption is not offered in the region). See docs/deploy.md.')
@allowed([
  'FlexConsumption'
  'Dedicated'
])
param hostingPlan string

@description('App Service plan SKU when hostingPlan is Dedicated.')
param dedicatedSkuName string = 'B1'

@description('Flex Consumption: most instances the app scales out to.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Flex Consumption: memory of one instance.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Flex Consumption runtime version for the custom stack.')
param customRuntimeVersion string = '1.0'

param storageAccountName string
param deploymentContainerName string
param appInsightsName string

@description('Resource id of the user-assigned identity the app runs as (identity.bicep).')
param identityId string

@description('Client id of that identity: the __clientId settings and the telemetry authentication.')
param identityClientId string

@description('Key Vault secret URI (unversioned) of the device API key.')
param deviceApiKeySecretUri string

@description('Host name of the Service Bus namespace (<ns>.servicebus.windows.net).')
param serviceBusFullyQualifiedNamespace string

param queueName string
param ledgerTableName string
param deviceApiBaseUrl string
param deviceApiTimeoutMs int
param requestTtlSeconds int
param recheckInitialSeconds int
param recheckMaxSeconds int
param drainSchedule string
param drainConcurrency int
param drainMaxDue int
param drainFanoutAbove int

@description('DEVICE_API_MAX_CALLS_PER_SECOND: the vendor\'s ceiling on device calls per second, for all instances together. Each instance gets this divided by DEVICE_API_INSTANCES (README "Device-call budget").')
@minValue(1)
param deviceApiMaxCallsPerSecond int

@description('SOC_NOTIFY_TOPIC_ENDPOINT: the Event Grid topic the request notifications are published to (eventgrid.bicep), with the identity.')
param notifyTopicEndpoint string

@description('RUST_LOG: the handler\'s log filter; empty means info. Raise it (e.g. debug) without a rebuild.')
param logFilter string = ''

param tags object = {}

var isFlex = hostingPlan == 'FlexConsumption'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  // checkov:skip=CKV_AZURE_225: zone redundancy on Flex Consumption needs at least two always-ready instances per function group; a cost decision, see docs/deploy.md
  kind: isFlex ? 'functionapp' : 'linux'
  sku: isFlex ? {
    name: 'FC1'
    tier: 'FlexConsumption'
  } : {
    name: dedicatedSkuName
  }
  properties: {
    reserved: true
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222: a public API called by the mobile app backend; callers need function keys (authLevel function)
  // checkov:skip=CKV_AZURE_17: client certificates are not part of the API contract; function keys are
  // checkov:skip=CKV_AZURE_212: the plan scales on demand (Flex Consumption); a fixed instance minimum is a cost decision, see docs/deploy.md
  // checkov:skip=CKV_AZURE_213: the Functions host supervises the handler process itself (it probes GET / and restarts it); there is no App Service health check path for a function app
  // checkov:skip=CKV_AZURE_78: Flex Consumption rejects siteConfig.ftpsState; the Dedicated branch sets it Disabled (infra/tests assert both branches)
  // checkov:skip=CKV_AZURE_15: checkov cannot evaluate the siteConfig ternary; both branches set minTlsVersion 1.2 (infra/tests assert it)
  // checkov:skip=CKV_AZURE_18: checkov cannot evaluate the siteConfig ternary; both branches set http20Enabled (infra/tests assert it)
  // checkov:skip=CKV_AZURE_67: same as CKV_AZURE_18, both siteConfig branches set http20Enabled
  name: appName
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    publicNetworkAccess: 'Enabled'
    // The Key Vault reference is resolved with the user-assigned identity
    // (the platform default would be a system-assigned one, which the app has not).
    keyVaultReferenceIdentity: identityId
    // Flex Consumption declares the runtime here instead of in app settings:
    // the custom stack is what runs host.json's customHandler executable.
    functionAppConfig: isFlex ? {
      runtime: {
        name: 'custom'
        version: customRuntimeVersion
      }
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
    } : null
    // Flex Consumption rejects ftpsState, linuxFxVersion and alwaysOn (the
    // Flex deprecations in the app settings reference), even as null: its
    // branch carries none of them. The Dedicated branch needs all three.
    siteConfig: isFlex ? {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
    } : {
      linuxFxVersion: ''
      alwaysOn: true
      ftpsState: 'Disabled'
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
    }
  }
}

// Host settings. On Flex Consumption the platform owns FUNCTIONS_WORKER_RUNTIME
// and FUNCTIONS_EXTENSION_VERSION (functionAppConfig.runtime above sets them);
// on a Dedicated plan they are ordinary app settings. Telemetry authenticates
// with the user-assigned identity (ClientId=).
var platformSettings = isFlex ? {
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
} : {
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  FUNCTIONS_WORKER_RUNTIME: 'custom'
  FUNCTIONS_EXTENSION_VERSION: '~4'
  WEBSITE_RUN_FROM_PACKAGE: '1'
}

// Every setting in config::SETTINGS, nothing else (tests/infra_settings.rs).
// Both connections are identity-based (the `X__` form the host and the handler
// read): no key or connection string. `__clientId` names the user-assigned
// identity; host and handler both ask for its tokens.
var socSettings = {
  AzureWebJobsStorage__accountName: storage.name
  AzureWebJobsStorage__tableServiceUri: storage.properties.primaryEndpoints.table
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  SOC_STATE_STORAGE: ''
  SOC_STATE_TABLE: ledgerTableName
  ServiceBusConnection__fullyQualifiedNamespace: serviceBusFullyQualifiedNamespace
  ServiceBusConnection__credential: 'managedidentity'
  ServiceBusConnection__clientId: identityClientId
  SOC_QUEUE_NAME: queueName
  DEVICE_API_BASE_URL: deviceApiBaseUrl
  DEVICE_API_KEY: '@Microsoft.KeyVault(SecretUri=${deviceApiKeySecretUri})'
  DEVICE_API_TIMEOUT_MS: string(deviceApiTimeoutMs)
  SOC_REQUEST_TTL_SECONDS: string(requestTtlSeconds)
  SOC_RECHECK_INITIAL_SECONDS: string(recheckInitialSeconds)
  SOC_RECHECK_MAX_SECONDS: string(recheckMaxSeconds)
  DRAIN_SOC_SCHEDULE: drainSchedule
  DRAIN_SOC_CONCURRENCY: string(drainConcurrency)
  DRAIN_SOC_MAX_DUE: string(drainMaxDue)
  DRAIN_SOC_FANOUT_ABOVE: string(drainFanoutAbove)
  DEVICE_API_MAX_CALLS_PER_SECOND: string(deviceApiMaxCallsPerSecond)
  // The most instances that can run at once, which the ceiling is divided by: Flex
  // scales out to maximumInstanceCount; the Dedicated plan runs its one worker (the
  // plan's default capacity; raise this with it if the plan is scaled out).
  DEVICE_API_INSTANCES: string(isFlex ? maximumInstanceCount : 1)
  // Published with the identity __clientId names (EventGrid Data Sender on the
  // topic); SOC_NOTIFY_TOPIC_KEY is for local runs only: empty here (no key, and the
  // topic's local auth is off).
  SOC_NOTIFY_TOPIC_ENDPOINT: notifyTopicEndpoint
  SOC_NOTIFY_TOPIC_KEY: ''
  // A battery reporting another value than applied: recorded and published (docs/events.md);
  // 'reassert' would also request the applied value again.
  SOC_DRIFT_POLICY: 'report'
  SOC_EXTRA_CA_CERTS: ''
  RUST_LOG: logFilter
}

// The identity's roles exist before the site does (identity.bicep). Role
// propagation can still lag behind an assignment (up to 10 minutes):
// scripts/deploy-check roles waits that out on a first deployment, and
// scripts/deploy-check keyvault-refs (after every deployment) refreshes the
// reference until it resolves.
resource appSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  // Only the app settings list; checkov reads every sites/config as web config.
  // checkov:skip=CKV_AZURE_13: not web config; callers authenticate with function keys
  // checkov:skip=CKV_AZURE_63: not web config; host and handler logs go to Application Insights
  // checkov:skip=CKV_AZURE_65: not web config; host and handler logs go to Application Insights
  // checkov:skip=CKV_AZURE_66: not web config; host and handler logs go to Application Insights
  // checkov:skip=CKV_AZURE_80: not web config; the app runs no .NET code
  // checkov:skip=CKV_AZURE_88: not web config; a function app keeps no files on Azure Files
  // checkov:skip=CKV_AZURE_222: not web config; see the same skip on the site
  parent: site
  name: 'appsettings'
  properties: union(platformSettings, socSettings)
}

output appName string = site.name
output defaultHostname string = site.properties.defaultHostName
output appInsightsName string = appInsights.name
