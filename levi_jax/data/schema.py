"""The publishers' raw formats as data: file names, columns and value sets.

Shared by the parsers (`levi_jax.data.formats`), the TFDS source and the
generators of synthetic worlds (`levi_jax.data.synthetic`,
`levi_jax.data.synthetic_scale`), which write files the parsers read; a leaf
module, so that writing a world does not depend on parsing one.
"""

import re

# TFDS's label set for MovieLens genres (`movielens.py`).
GENRES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance",
          "Sci-Fi", "Thriller", "Unknown", "War", "Western", "(no genres listed)")
# u.item's 19 genre flags, in file order ("Children's" as TFDS spells it: "Children").
ML100K_GENRE_FLAGS = ("Unknown", "Action", "Adventure", "Animation", "Children", "Comedy",
                      "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
                      "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
# TFDS's occupation labels, consistent across 100K and 1M.
OCCUPATION_LABELS = (
    "academic/educator", "artist", "clerical/admin", "customer service", "doctor/health care",
    "entertainment", "executive/managerial", "farmer", "homemaker", "lawyer", "librarian",
    "other/not specified", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "student", "technician/engineer", "tradesman/craftsman", "unemployed",
    "writer")
ML100K_OCCUPATIONS = {
    "administrator": "clerical/admin", "artist": "artist", "doctor": "doctor/health care",
    "educator": "academic/educator", "engineer": "technician/engineer",
    "entertainment": "entertainment", "executive": "executive/managerial",
    "healthcare": "doctor/health care", "homemaker": "homemaker", "lawyer": "lawyer",
    "librarian": "librarian", "marketing": "sales/marketing", "none": "other/not specified",
    "other": "other/not specified", "programmer": "programmer", "retired": "retired",
    "salesman": "sales/marketing", "scientist": "scientist", "student": "student",
    "technician": "technician/engineer", "writer": "writer"}
ML1M_OCCUPATIONS = (
    "other/not specified", "academic/educator", "artist", "clerical/admin",
    "college/grad student", "customer service", "doctor/health care", "executive/managerial",
    "farmer", "homemaker", "K-12 student", "lawyer", "programmer", "retired", "sales/marketing",
    "scientist", "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed",
    "writer")
AGE_BUCKETS = (1, 18, 25, 35, 45, 50, 56)

ML_USER_COLUMNS = {"user_gender": "bool", "bucketized_user_age": "float32",
                   "user_occupation_label": "str", "user_occupation_text": "str",
                   "user_zip_code": "str"}
ML100K_USER_COLUMNS = {**ML_USER_COLUMNS, "raw_user_age": "float32"}
ML_ITEM_COLUMNS = {"movie_title": "str", "movie_genres": "bag"}
AMAZON_ITEM_COLUMNS = {"item_title": "str", "item_category": "str", "item_subcategories": "bag",
                       "item_brand": "str", "item_price": "float64"}
AMAZON_US_ITEM_COLUMNS = {"item_title": "str", "item_category": "str"}

ML100K_FILES = ("u.data", "u.user", "u.item")
ML1M_FILES = ("ratings.dat", "users.dat", "movies.dat")
# Category names are capitalized in the published files ("Books", "AMAZON_FASHION").
AMAZON_REVIEWS_RE = re.compile(
    r"^(?!meta_)(?:reviews_)?(?P<cat>[A-Z][\w,&-]*?)(?:_5)?\.json(?:\.gz)?$")
AMAZON_META_RE = re.compile(r"^meta_(?P<cat>.+?)\.json(?:\.gz)?$")
AMAZON_TSV_RE = re.compile(r"^amazon_reviews_(?:us_)?(?P<cat>.+?)(?:_v\d+_\d+)?\.tsv(?:\.gz)?$")
AMAZON_TSV_REQUIRED = ("customer_id", "product_id", "star_rating", "review_date")

# The encodings the publishers declare.
MOVIELENS_ENCODING = "latin-1"
AMAZON_ENCODING = "utf-8"
