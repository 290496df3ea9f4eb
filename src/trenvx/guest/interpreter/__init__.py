"""trenvx code interpreter: the server that runs code cells in Jupyter kernels inside a sandbox.

It speaks the protocol of E2B's code-interpreter server (port 49999), so that E2B's
``e2b_code_interpreter`` SDK (``Sandbox.run_code``, ``create_code_context``, ...) works
against a trenvx sandbox:

* ``GET /health``: 200 once the default python kernel is up (503 with the reason before)
* ``POST /execute``: run a cell; the answer streams one JSON object per line (stdout, stderr,
  results, error, the execution count, then ``end_of_execution``)
* ``POST /contexts``, ``GET /contexts``, ``DELETE /contexts/{id}``,
  ``POST /contexts/{id}/restart``: contexts, each its own kernel

Languages: ``python`` (ipykernel; alias ``python3``) and ``bash`` (the ``bash_kernel``
package's kernel; alias ``sh``).

Standard library plus ``jupyter_client`` (Debian bookworm's 7.4 or a newer one from pip).
Inside the guest it is installed as the package ``trenvx_interpreter`` and started (as
root; the kernels run as the sandbox's user) with
``PYTHONPATH=/opt/trenvx python3 -m trenvx_interpreter --port 49999``; on the host the same
code is ``trenvx.guest.interpreter``. Modules import each other relatively and nothing
else of trenvx.
"""

__version__ = "0.1.0"

DEFAULT_PORT = 49999
