"""The token-level guidance: the model and its listwise fit (``model``), rankings of samples (``ranking``),
preference data people already have (``preferences``), a guidance fitted from a preference file alone
(``standalone``: ``ptg guidance fit / eval / score``) and its diagnostics.
"""
