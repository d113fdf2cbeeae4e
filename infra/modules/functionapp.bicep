// The function app: Linux, custom handler (the Rust binary `handler`),
// system-assigned identity, and every app setting the handler reads.
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
param keyVaultName string

@description('Key Vault secret URI (unversioned) of the Service Bus connection string.')
param serviceBusSecretUri string

@description('Key Vault secret URI (unversioned) of the device API key.')
param deviceApiKeySecretUri string

param queueName string
param ledgerTableName string
param deviceApiBaseUrl string
param deviceApiTimeoutMs int
param requestTtlSeconds int
param recheckInitialSeconds int
param recheckMaxSeconds int
param drainSchedule string
param drainConcurrency int

param tags object = {}

var isFlex = hostingPlan == 'FlexConsumption'

// Built-in role definition ids.
var keyVaultSecretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6'
var storageBlobDataContributorRoleId = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: storage
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: deploymentContainerName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
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
  name: appName
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    publicNetworkAccess: 'Enabled'
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
            type: 'SystemAssignedIdentity'
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
    } : null
    siteConfig: {
      linuxFxVersion: isFlex ? null : ''
      alwaysOn: isFlex ? null : true
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
    }
  }
}

// Least privilege for the identity: read secrets of this one vault ...
resource secretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, site.id, keyVaultSecretsUserRoleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUserRoleId)
    principalId: site.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// ... and, on Flex Consumption, read/write the one container the platform
// fetches the app package from (scoped to that container, not the account).
resource packageReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (isFlex) {
  name: guid(deploymentContainer.id, site.id, storageBlobDataContributorRoleId)
  scope: deploymentContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributorRoleId)
    principalId: site.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// Host settings. On Flex Consumption the platform owns FUNCTIONS_WORKER_RUNTIME
// and FUNCTIONS_EXTENSION_VERSION (functionAppConfig.runtime above sets them);
// on a Dedicated plan they are ordinary app settings.
var platformSettings = isFlex ? {
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString
} : {
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString
  FUNCTIONS_WORKER_RUNTIME: 'custom'
  FUNCTIONS_EXTENSION_VERSION: '~4'
  WEBSITE_RUN_FROM_PACKAGE: '1'
}

// Every setting in config::SETTINGS, nothing else (tests/infra_settings.rs).
// AzureWebJobsStorage is a key-based connection string because the handler's
// Table client (azure_data_tables 0.21) takes a connection string; the host
// could use an identity, the handler as written cannot.
var socSettings = {
  AzureWebJobsStorage: 'DefaultEndpointsProtocol=https;AccountName=${storage.name};EndpointSuffix=${environment().suffixes.storage};AccountKey=${storage.listKeys().keys[0].value}'
  SOC_STATE_STORAGE: ''
  SOC_STATE_TABLE: ledgerTableName
  ServiceBusConnection: '@Microsoft.KeyVault(SecretUri=${serviceBusSecretUri})'
  SOC_QUEUE_NAME: queueName
  DEVICE_API_BASE_URL: deviceApiBaseUrl
  DEVICE_API_KEY: '@Microsoft.KeyVault(SecretUri=${deviceApiKeySecretUri})'
  DEVICE_API_TIMEOUT_MS: string(deviceApiTimeoutMs)
  SOC_REQUEST_TTL_SECONDS: string(requestTtlSeconds)
  SOC_RECHECK_INITIAL_SECONDS: string(recheckInitialSeconds)
  SOC_RECHECK_MAX_SECONDS: string(recheckMaxSeconds)
  DRAIN_SOC_SCHEDULE: drainSchedule
  DRAIN_SOC_CONCURRENCY: string(drainConcurrency)
}

// Applied after the role assignments exist, so the first resolution of the
// Key Vault references happens with the identity already allowed to read.
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
  dependsOn: [
    secretsUser
    packageReader
  ]
}

output appName string = site.name
output defaultHostname string = site.properties.defaultHostName
output principalId string = site.identity.principalId
