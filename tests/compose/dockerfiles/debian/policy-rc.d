#!/bin/sh
# No init runs in a container: packages must not start their services while installing.
exit 101
