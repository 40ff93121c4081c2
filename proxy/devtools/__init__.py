"""Development tools: the OpenAI-compatible fake upstream and the demo config.
Never imported by production code (only the CLI's `demo` and `fake-upstream`)."""
