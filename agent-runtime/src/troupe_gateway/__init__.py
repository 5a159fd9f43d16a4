"""The Troupe gateway: HTTP in, NATS out. A2A v1.0, MCP and plain request/reply for every
Agent and Workflow, and the webhook and subject sources of Triggers.

Stateless: every replica reads the operator's directory and the task records from NATS, so
any replica answers any call and one killed mid-call loses nothing (``contract.gateway``).

Modules, one responsibility each:

- ``calls``: a call as a task (submit, wait, get, list, cancel, stream), on NATS;
- ``directory``: the operator's ``DirectoryEntry`` per Agent and Workflow, cached;
- ``auth``: who is calling (TokenReview, API keys) and may they (SubjectAccessReview);
- ``kube``: the few Kubernetes API calls auth needs, async;
- ``a2a_server`` and ``cards``: A2A v1.0 through the official SDK's routes;
- ``mcp_server``: each Agent and Workflow as an MCP tool over streamable HTTP;
- ``plain``: POST an input, get the output;
- ``webhooks`` and ``relay``: Trigger sources;
- ``app``: the routes; ``settings`` and ``__main__``: the process.
"""
