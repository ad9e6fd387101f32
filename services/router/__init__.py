"""Router: validates requests against the model's spec and drives the stages in order."""
