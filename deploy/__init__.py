"""Deployment: launching and supervising Flower's SuperLink and SuperNodes, and their CLI."""
