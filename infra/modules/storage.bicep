// The function app's storage account: AzureWebJobsStorage (host keys, timer
// locks), the settings ledger table, and the blob container Flex Consumption
// deploys the package into. Shared keys are off: the host, the platform and
// the handler all reach it with the function app's managed identity (Entra ID
// roles assigned in identity-roles.bicep), so no account key is ever handed out.

@description('Azure region.')
param location string

@description('Storage account name (3-24 lowercase letters and digits).')
param accountName string

@description('Table holding the per-device desired-state ledger (SOC_STATE_TABLE). The handler also creates it if missing.')
param ledgerTableName string

@description('Blob container the Flex Consumption plan deploys the app package to.')
param deploymentContainerName string

@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param skuName string

param tags object = {}

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_59: no virtual network in this design; the Functions host and the handler reach the account over its public endpoint (TLS 1.2, no anonymous blob access)
  // checkov:skip=CKV_AZURE_35: same reason as CKV_AZURE_59, a deny-by-default firewall would lock out the function app
  // checkov:skip=CKV_AZURE_206: redundancy is the skuName parameter, chosen per environment (prod: Standard_ZRS)
  // checkov:skip=CKV_AZURE_43: the name is computed in main.bicep from lowercase letters and digits, cut to 24 characters; checkov cannot evaluate the parameter
  name: accountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    supportsHttpsTrafficOnly: true
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource ledgerTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: ledgerTableName
}

output accountName string = account.name
output deploymentContainerName string = deploymentContainer.name
output ledgerTableName string = ledgerTable.name
