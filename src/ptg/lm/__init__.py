"""The language model: loading and saving it (``models``, ``base_models``, ``tiny_models``), prompts and responses
as token ids (``encoding``), sampling, precision and devices, data-parallel processes (``distributed``), and
learning: the training loop (``train``: weighted MLE, REINFORCE, policy gradient), GRPO through TRL (``grpo``), a
sequence-classification reward model (``reward_model``).
"""
