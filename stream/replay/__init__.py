"""Replays and backtests: what FinPulse would have said, and when it would have alerted, with a chosen model and
thresholds over a past event-time range, reproducibly and without touching anything live.

* ``finpulse replay --from T1 --to T2 --run-id ID [--model DIR] [--config FILE] [--archive DIR] ...`` selects the
  input messages whose *event time* is in ``[T1, T2)`` (``select.py``: searched per partition in the records
  themselves, since ``offsets_for_times`` is broker write time), re-scores them with the worker's own scoring code
  and runs the live ``WindowAggregator`` and ``SpikeDetector`` with the chosen thresholds (``run.py``). Outputs go to
  ``<prefix>.replay.<ID>.{scored,trends,alerts}`` (created up front) and Parquet in ``var/replay/<ID>/``
  (``output.py``); alerts reach a webhook only with ``--test-endpoint NAME``, and only the endpoint set aside as
  ``[alerts] replay_endpoint``. Before ``T1`` it reads a warm-up (``--warmup``, default: the detector's own need)
  that builds windows and baselines and writes nothing. ``--config FILE`` holds only ``[aggregate]``/``[detect]``.
  Resumable after Ctrl-C. Bad arguments fail before anything is written (``plan.py``). ``--scores-from RUN``
  takes each message's prediction from an earlier run instead of the model (``reuse.py``): a threshold trial at a
  fraction of the cost, with the outputs a full replay would write.
* ``finpulse runs`` lists the runs (directories and topics); ``finpulse runs delete ID --yes`` deletes one's topics,
  dispatcher group and directory, and refuses anything that is not that run's (``runs.py``).
* ``finpulse export --from T1 --to T2 --out DIR`` archives the input topics to Parquet by event-time day
  (``archive.py``); ``replay --archive DIR`` reads them back in the same order as from Kafka, past retention.
* ``finpulse backtest --run-id ID [--events events.csv] [--prices prices.csv]`` reports alert precision, recall and
  lead time against labeled events, and an event study of forward returns (``backtest.py``, ``report.py``); with
  several ``--run-id`` it also compares them side by side.

**Reproducibility: byte-identical Parquet.** The same inputs, model and config give byte-identical Parquet files:

1. *Same input order.* Messages are processed in one total order, (event time, topic, partition, offset), which
   the Kafka merge and the archive reader both produce whatever the fetch timing (``select.py``). Same inputs means
   the same messages in the range and its warm-up (and disorder within ``[replay] max_disorder_s``, else a warning
   says so).
2. *Same computation.* The scorer sees the same batches (``[replay] batch_size`` messages cut from the ordered
   input, also after a resume) and is deterministic for a given batch on a given device, precision and library
   version (the manifest's ``scored_on``: ``[worker] cpu_precision = auto`` is bf16 on a CPU with bfloat16
   instructions, float32 on one without); the aggregator and detector are pure functions of their input sequence.
3. *No wall clock.* Rows hold no wall-clock time: ``scored_at`` is not written (it equals the event time on the
   replay topics), and ``emitted_at`` is event time (a window's end plus the allowed lateness). The run id is not
   in the rows (it names the directory and is in ``manifest.json``), so the run id does not matter either.
4. *Fixed files.* Rows are written in processing order into parts cut at fixed input counts
   (``[replay] part_records``), with an explicit Arrow schema, fixed writer options and fixed key-value metadata
   (``parquet.py``); ``created_by`` names the pyarrow version, so compare runs made with the same pyarrow.

Every row carries ``model_version`` and ``config_hash`` (a hash of the effective ``[aggregate]``, ``[detect]``,
``[worker] max_text_chars`` and ``[replay] batch_size``; see ``plan.py``). Check it with
``cmp var/replay/A/scored/part-00000.parquet var/replay/B/scored/part-00000.parquet``, or ``sha256sum`` over both
directories' ``*/part-*.parquet``.
"""
