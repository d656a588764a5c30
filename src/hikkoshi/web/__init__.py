"""The dashboard: the cluster's hosts, VMs and migrations, live, in a browser (``hikkoshi dashboard``).

Top layer (beside ``cli``): it reads and acts through the agents' HTTP API, the same one the CLI uses,
and in a cluster finds the agents through etcd (``cluster``). Modules, one idea each:

- ``views``: what the pages show (hosts, VMs, migrations), as data.
- ``source``: where that comes from, behind one small interface; ``agent_source`` (``--agent URL``,
  one or more agents) and ``etcd_source`` (``--etcd URL``: the hosts the cluster lists, their agents).
- ``progress`` (pure): a migration's state as a word, its overall progress that never runs backwards,
  time left. ``timeline`` (pure): a migration's samples and record as the page's charts and tables.
- ``prediction``: what a migration will cost, before it starts (``hikkoshi.migrate.predict``).
- ``auth``: the token typed on the login page, and sessions (an HttpOnly, SameSite=Strict cookie).
- ``forms``: bounded form bodies. ``events``: server-sent events. ``pages``: the routes that render
  templates. ``app``: the FastAPI application. ``server``: serving it on exactly the address given.
- ``templates/`` (Jinja2) and ``static/`` (CSS, small scripts, uPlot vendored from npm).
"""
