"""What tests in more than one folder share; a folder's own pieces stay in its <folder>_helpers.py.

- wait: bounded polling (`wait_for`, `wait_for_sync`) and a child's port file (`wait_for_port_file`);
- configs: service configs for tests (`controller_config`, `storage_config`, `balancer_config`);
- records: etcd records a test writes or reads (`put_deployment`, `put_endpoint`, `replicas_of`);
- runtimes: real runtime processes serving the bundled model, registered in etcd (`runtime_processes`), a balancer
  over them (`balancer_over`) and an openai client on it (`openai_client`);
- services: a storage node, a controller and a balancer in the test's process (`services_in_process`);
- sse: the events of an OpenAI stream (`sse_events`);
- state: an EtcdState on a fresh prefix (`prefixed_state`, `fresh_prefix`);
- storage: a misbehaving ranged HTTP source (`RangedSource`) and a storage service in this process
  (`running_storage`, `pull`, ...).
`clowder up` as a user runs it is tests/cluster_helpers.py. The bundled model is
`clowder_cli.bundled.bundled_model_path` (the `model_path` fixture in tests/conftest.py).
"""
