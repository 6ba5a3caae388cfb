"""What composes data, models and feedback: the default sentiment task, the review-gpt recipe, the real-data splits."""
