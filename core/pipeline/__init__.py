"""The offline build pipeline: corpus, SAE family training, evaluation and its report.

It builds the shipped data in ``data/``; the runtime modules the pages call never import it.
"""
