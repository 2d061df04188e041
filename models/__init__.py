"""models: FinPulse's judgement. One multi-task classifier (20 finance topics x bearish/neutral/bullish):
training, calibration, evaluation, the saved-model directory format, and the batched scorer the worker calls.

Everything outside this package talks to it through ``models.interface`` (``Scorer``, ``Prediction``,
``load_scorer``); nothing else imports torch.
"""
