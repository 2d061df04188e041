"""stream: FinPulse's data path on Kafka. Ingest news and comments, score them in micro-batches with the
classifier, aggregate scored records into rolling per-topic and per-ticker windows, and replay history.

Records (``stream.records``), topic names (``stream.topics``), settings (``stream.config``), the ``finpulse``
command line (``stream.cli``) and what operators scrape and probe (``stream.metrics``, ``stream.ops``) live here
because every other package builds on them.
"""
