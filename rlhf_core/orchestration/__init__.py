"""What DVC and Prefect run, shared by the `rlhf` command (rlhf_core.app) and the flows:
the `rlhf stage` commands DVC calls (`stage_commands`), the warm stage server that runs them
(`warm_stages`), and the preference store's DVC versioning and ingest event
(`store_versioning`). It imports the library, never rlhf_core.app, flows/ or tasks/."""
