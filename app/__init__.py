"""optiforge API: routes, schemas, DB models, artifact store, engine pool."""

__version__ = "0.1.0"
