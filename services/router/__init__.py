"""Router: validates requests against the model's spec, batches them, drives the stages in order."""
