"""A toy review-sentiment task, written the way a user's own code for hutch is: a data set,
a Hugging Face-style model and a loss, found by import path (``reviews.data:Reviews``, …)."""
