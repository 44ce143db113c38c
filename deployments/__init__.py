"""mmkd's Prefect deployments (prefect.yaml), installed with the package so that `mmkd deploy` finds them anywhere."""
