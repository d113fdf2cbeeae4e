// Log Analytics workspace and the workspace-based Application Insights
// resource the Functions host sends its logs and the handler's stdout to.
// Local (instrumentation key) authentication is off: the host sends telemetry
// with the app's managed identity (APPLICATIONINSIGHTS_AUTHENTICATION_STRING,
// set in functionapp.bicep; role Monitoring Metrics Publisher in
// identity-roles.bicep).

@description('Azure region.')
param location string

param workspaceName string
param appInsightsName string

@minValue(30)
param retentionDays int

param tags object = {}

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    IngestionMode: 'LogAnalytics'
    DisableLocalAuth: true
  }
}

output appInsightsName string = appInsights.name
output workspaceName string = workspace.name
