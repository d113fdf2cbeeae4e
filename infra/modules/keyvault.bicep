// The device module's Key Vault (RBAC mode). It holds the two secrets the
// handler needs: the Service Bus connection string, written here by the
// deployment from the rule the Service Bus module created, and the vendor's
// device API key, passed in as a secure parameter. It must be deployed after
// the Service Bus module; main.bicep passes that module's outputs in, which
// makes Resource Manager order the two.

@description('Azure region.')
param location string

@description('Key Vault name (3-24 characters).')
param vaultName string

@description('Service Bus namespace created by the Service Bus module.')
param serviceBusNamespaceName string

@description('Send/listen authorization rule created by the Service Bus module.')
param serviceBusRuleName string

@description('x-api-key for the device cloud API.')
@secure()
param deviceApiKey string

@description('Days a deleted vault or secret stays recoverable.')
@minValue(7)
@maxValue(90)
param softDeleteRetentionDays int

param tags object = {}

resource serviceBusNamespace 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' existing = {
  name: serviceBusNamespaceName
}

resource serviceBusRule 'Microsoft.ServiceBus/namespaces/authorizationRules@2022-10-01-preview' existing = {
  parent: serviceBusNamespace
  name: serviceBusRuleName
}

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

resource serviceBusSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  // checkov:skip=CKV_AZURE_41: the function app reads this secret continuously; an expiry date would stop the service. Rotate by regenerating the Service Bus rule key and redeploying
  parent: vault
  name: 'servicebus-connection'
  properties: {
    contentType: 'text/plain; Service Bus connection string'
    value: serviceBusRule.listKeys().primaryConnectionString
  }
}

resource deviceApiKeySecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  // checkov:skip=CKV_AZURE_41: same as servicebus-connection, the vendor's key has no fixed lifetime; rotate by redeploying with the new key
  parent: vault
  name: 'device-api-key'
  properties: {
    contentType: 'text/plain; device cloud API key'
    value: deviceApiKey
  }
}

output vaultName string = vault.name
// Unversioned URIs: a Key Vault reference without a version follows the latest secret version.
output serviceBusSecretUri string = serviceBusSecret.properties.secretUri
output deviceApiKeySecretUri string = deviceApiKeySecret.properties.secretUri
