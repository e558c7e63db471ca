"""The services' JSON contracts as pydantic models (pydantic only: no web framework), shared by
the services, which validate requests and document answers with them, and by the SDK."""
