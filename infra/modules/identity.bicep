// The function app's one identity, user-assigned, and its roles. main.bicep
// deploys this module before the function app (the app takes its outputs), so
// the identity exists and holds every role before the site is created: the
// Key Vault reference, Flex Consumption's package download, the host's
// storage and Service Bus connections, telemetry and the notifications never race an identity
// that is still being created or granted (docs/deploy.md, first deployment).
// A re-created app keeps this identity, so its role assignments stay valid.

@description('Azure region.')
param location string

param identityName string
param storageAccountName string
param serviceBusNamespaceName string
param queueName string
param keyVaultName string
param deviceApiKeySecretName string
param appInsightsName string
param eventGridTopicName string

param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: identityName
  location: location
  tags: tags
}

// A module of its own: role assignment names must be known when the
// deployment starts, and a module parameter is, where the identity's
// principalId read in this file would not be.
module roles 'identity-roles.bicep' = {
  name: 'identity-roles'
  params: {
    principalId: identity.properties.principalId
    storageAccountName: storageAccountName
    serviceBusNamespaceName: serviceBusNamespaceName
    queueName: queueName
    keyVaultName: keyVaultName
    deviceApiKeySecretName: deviceApiKeySecretName
    appInsightsName: appInsightsName
    eventGridTopicName: eventGridTopicName
  }
}

output id string = identity.id
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
// Waiting on this output makes the caller wait for the role assignments too.
output roleAssignmentIds array = roles.outputs.roleAssignmentIds
