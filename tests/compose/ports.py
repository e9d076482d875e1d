"""Host ports the test stacks publish on 127.0.0.1, chosen free for each run.

compose.yaml publishes 8000 and 4200 by default; a machine may already serve
something there (a `pmq dev`, another stack), so the tests ask for a free block
instead, through the same variables an operator would set.
"""

import socket
from dataclasses import dataclass

SEARCH_FROM, SEARCH_TO = 20_000, 32_000  # below Linux's ephemeral range (32768-)
BLOCK = 4  # two frontends, Prefect, the fault proxy's control port


@dataclass(frozen=True)
class Published:
    base: int

    @property
    def frontend(self) -> int:
        return self.base

    @property
    def prefect(self) -> int:
        return self.base + 2

    @property
    def proxy(self) -> int:
        return self.base + 3

    def env(self, frontends: int = 1) -> dict[str, str]:
        """compose.yaml's and faults.yaml's publishing variables for this block."""
        last = self.frontend + frontends - 1
        return {
            "PMQ_PUBLISH_PORTS": f"{self.frontend}-{last}" if frontends > 1 else str(last),
            "PMQ_PREFECT_PUBLISH_PORT": str(self.prefect),
            "PMQ_PROXY_PUBLISH_PORT": str(self.proxy),
        }


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_block() -> Published:
    for base in range(SEARCH_FROM, SEARCH_TO, BLOCK):
        if all(_free(port) for port in range(base, base + BLOCK)):
            return Published(base)
    raise RuntimeError(f"no {BLOCK} free ports on 127.0.0.1 in {SEARCH_FROM}-{SEARCH_TO}")


# One block per test process: the constants below are what every fixture uses.
PUBLISHED = free_block()
FRONTEND_URL = f"http://127.0.0.1:{PUBLISHED.frontend}"
PREFECT_API = f"http://127.0.0.1:{PUBLISHED.prefect}/api"
PROXY_CONTROL = f"http://127.0.0.1:{PUBLISHED.proxy}"
