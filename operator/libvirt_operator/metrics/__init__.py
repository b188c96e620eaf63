"""Prometheus metrics of the controller and the node agent, all named `libvirt_operator_*`.

`common` holds what both components expose (reconcile passes, build info) and the HTTP
endpoint; `agent` and `controller` hold each component's own metrics. A process imports only
the module of its component, so it exposes only its own families.
"""
