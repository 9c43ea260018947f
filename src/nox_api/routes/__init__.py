"""HTTP routes, one module per resource. Handlers parse, authorize, call a service, answer."""
