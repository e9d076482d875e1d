"""The production stack (compose.yaml) in a real Docker engine on this machine.

`make test-compose` builds the images (images.py), starts a private engine
(dockerd.py), brings the stack up with docker-compose (stack.py) and drives it
as an operator would (test_stack.py). `make test` leaves it out (conftest.py).
"""
