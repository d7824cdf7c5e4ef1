"""Imported only by the allow-list test, which checks that a refused path is never imported."""


def job(message):
    pass
