"""The web console at /ui: server-rendered pages whose data comes from the public API, called by
the browser with the person's API key (no endpoint of its own)."""
