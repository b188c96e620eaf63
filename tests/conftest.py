# The local world's fixtures (real control plane, real libvirt nodes, test guest)
# live in hack/localenv so that the CLI and the tests share one implementation.
pytest_plugins = ["localenv.fixtures_libvirt", "localenv.fixtures_kube", "localenv.fixtures_operator"]
