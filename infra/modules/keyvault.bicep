// The Key Vault (RBAC mode). It holds the one value that must stay a secret:
// the vendor's device API key, passed in as a secure parameter. Azure
// resources (storage, Service Bus, Application Insights) are reached with the
// function app's managed identity, so no Azure key is stored here.

@description('Azure region.')
param location string

@description('Key Vault name (3-24 characters).')
param vaultName string

@description('x-api-key for the device cloud API.')
@secure()
param deviceApiKey string

@description('Days a deleted vault or secret stays recoverable.')
@minValue(7)
@maxValue(90)
param softDeleteRetentionDays int

param tags object = {}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: vaultName
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: softDeleteRetentionDays
    // Deleted secrets stay recoverable for softDeleteRetentionDays in every
    // environment. Consequence: a deleted vault's name is blocked for that long.
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForTemplateDeployment: false
    enabledForDiskEncryption: false
    publicNetworkAccess: 'Enabled'
    // checkov:skip=CKV_AZURE_109: Flex Consumption cannot resolve Key Vault references against a network-restricted vault (see docs/deploy.md); access is by Entra ID RBAC only
    // checkov:skip=CKV_AZURE_189: same reason as CKV_AZURE_109, public network access is needed for Key Vault references on Flex Consumption
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource deviceApiKeySecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  // checkov:skip=CKV_AZURE_41: the function app reads this secret continuously and the vendor's key has no fixed lifetime; an expiry date would stop the service. Rotate by redeploying with the new key
  parent: vault
  name: 'device-api-key'
  properties: {
    contentType: 'text/plain; device cloud API key'
    value: deviceApiKey
  }
}

output vaultName string = vault.name
output deviceApiKeySecretName string = deviceApiKeySecret.name
// Unversioned URIs: a Key Vault reference without a version follows the latest secret version.
output deviceApiKeySecretUri string = deviceApiKeySecret.properties.secretUri
