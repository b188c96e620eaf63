from libvirt_operator.agent.main import main

main()
