"""The distributed fault suite (`make test-faults`): faults on the compose topology.

Collected only with PMQ_FAULTS_TEST=1 (see tests/compose/conftest.py).
"""
