"""The pipeline from decoded kernel records to typed events: the flow table (``flows``), the
DNS/SNI/provider enrichment (``enrich``), the readers of LLM calls and MCP messages from plaintext
(``llmreader``, ``calls``) and busy-host aggregation (``busy``)."""
