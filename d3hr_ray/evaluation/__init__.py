"""Student evaluation (docs/method.md stage 6): the student registry, the training protocol, and the Ray Train loops."""
