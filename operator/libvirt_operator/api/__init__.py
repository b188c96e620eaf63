"""The API: pydantic models of the four custom resources, the single source of truth for crds/."""
