"""What a request means, apart from HTTP: looking records up, creating, queueing and cancelling jobs,
assembling their reports. Routes and the CLI call these; services never call routes."""
