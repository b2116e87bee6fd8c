"""Running ptg: project workspaces and their locks (``workspace``), Prefect work pools and deployments
(``prefect_setup``), and ptg's own speed (``perf``, ``perf_round``: ``ptg perf``).
"""
