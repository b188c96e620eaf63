from libvirt_operator.controller.main import main

main()
