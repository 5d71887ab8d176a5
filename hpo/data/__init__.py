"""Data: the built-in data sets and files (:mod:`hpo.data.builtin`), the user's own data by
import path (:mod:`hpo.data.user`) and how batches reach the device (:mod:`hpo.data.batches`)."""

from hpo.data.builtin import DataError, DataSpec, Split, Splits, load_data
from hpo.data.user import DataSource, UserData, load_user_data

#: What a trial trains on: a built-in data set's splits, or the user's data.
TrialData = Splits | UserData

__all__ = [
    "DataError",
    "DataSource",
    "DataSpec",
    "Split",
    "Splits",
    "TrialData",
    "UserData",
    "load_data",
    "load_user_data",
]
