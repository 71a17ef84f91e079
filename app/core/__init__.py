"""The service's core: settings, the database (session, ORM), the artifact store, the job queue
(configuration and publishing by task name), migrations and metrics. The API, serving and the
workers build on it; it imports none of them.
"""
