"""Thin helpers over the Kubernetes API shared by the controller and the agent."""
