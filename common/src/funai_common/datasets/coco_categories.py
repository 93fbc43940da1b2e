"""COCO category id -> supercategory tables, used when the dataset's own JSON is not present."""

# COCO-Stuff ids 92..182 (alphabetical stuff classes) and their supercategories; 183 (other) is dropped.
STUFF_SUPERCATEGORY = {
    92: "textile",  # banner
    93: "textile",  # blanket
    94: "plant",  # branch
    95: "building",  # bridge
    96: "building",  # building-other
    97: "plant",  # bush
    98: "furniture-stuff",  # cabinet
    99: "structural",  # cage
    100: "raw-material",  # cardboard
    101: "floor",  # carpet
    102: "ceiling",  # ceiling-other
    103: "ceiling",  # ceiling-tile
    104: "textile",  # cloth
    105: "textile",  # clothes
    106: "sky",  # clouds
    107: "furniture-stuff",  # counter
    108: "furniture-stuff",  # cupboard
    109: "textile",  # curtain
    110: "furniture-stuff",  # desk-stuff
    111: "ground",  # dirt
    112: "furniture-stuff",  # door-stuff
    113: "structural",  # fence
    114: "floor",  # floor-marble
    115: "floor",  # floor-other
    116: "floor",  # floor-stone
    117: "floor",  # floor-tile
    118: "floor",  # floor-wood
    119: "plant",  # flower
    120: "water",  # fog
    121: "food-stuff",  # food-other
    122: "food-stuff",  # fruit
    123: "furniture-stuff",  # furniture-other
    124: "plant",  # grass
    125: "ground",  # gravel
    126: "ground",  # ground-other
    127: "solid",  # hill
    128: "building",  # house
    129: "plant",  # leaves
    130: "furniture-stuff",  # light
    131: "textile",  # mat
    132: "raw-material",  # metal
    133: "furniture-stuff",  # mirror-stuff
    134: "plant",  # moss
    135: "solid",  # mountain
    136: "ground",  # mud
    137: "textile",  # napkin
    138: "structural",  # net
    139: "raw-material",  # paper
    140: "ground",  # pavement
    141: "textile",  # pillow
    142: "plant",  # plant-other
    143: "raw-material",  # plastic
    144: "ground",  # platform
    145: "ground",  # playingfield
    146: "structural",  # railing
    147: "ground",  # railroad
    148: "water",  # river
    149: "ground",  # road
    150: "solid",  # rock
    151: "building",  # roof
    152: "textile",  # rug
    153: "food-stuff",  # salad
    154: "ground",  # sand
    155: "water",  # sea
    156: "furniture-stuff",  # shelf
    157: "sky",  # sky-other
    158: "building",  # skyscraper
    159: "ground",  # snow
    160: "solid",  # solid-other
    161: "furniture-stuff",  # stairs
    162: "solid",  # stone
    163: "plant",  # straw
    164: "structural",  # structural-other
    165: "furniture-stuff",  # table
    166: "building",  # tent
    167: "textile",  # textile-other
    168: "textile",  # towel
    169: "plant",  # tree
    170: "food-stuff",  # vegetable
    171: "wall",  # wall-brick
    172: "wall",  # wall-concrete
    173: "wall",  # wall-other
    174: "wall",  # wall-panel
    175: "wall",  # wall-stone
    176: "wall",  # wall-tile
    177: "wall",  # wall-wood
    178: "water",  # water-other
    179: "water",  # waterdrops
    180: "window",  # window-blind
    181: "window",  # window-other
    182: "solid",  # wood
}

# The 80 COCO thing category ids and their 12 supercategories.
THING_SUPERCATEGORY = {
    1: "person",
    2: "vehicle",
    3: "vehicle",
    4: "vehicle",
    5: "vehicle",
    6: "vehicle",
    7: "vehicle",
    8: "vehicle",
    9: "vehicle",
    10: "outdoor",
    11: "outdoor",
    13: "outdoor",
    14: "outdoor",
    15: "outdoor",
    16: "animal",
    17: "animal",
    18: "animal",
    19: "animal",
    20: "animal",
    21: "animal",
    22: "animal",
    23: "animal",
    24: "animal",
    25: "animal",
    27: "accessory",
    28: "accessory",
    31: "accessory",
    32: "accessory",
    33: "accessory",
    34: "sports",
    35: "sports",
    36: "sports",
    37: "sports",
    38: "sports",
    39: "sports",
    40: "sports",
    41: "sports",
    42: "sports",
    43: "sports",
    44: "kitchen",
    46: "kitchen",
    47: "kitchen",
    48: "kitchen",
    49: "kitchen",
    50: "kitchen",
    51: "kitchen",
    52: "food",
    53: "food",
    54: "food",
    55: "food",
    56: "food",
    57: "food",
    58: "food",
    59: "food",
    60: "food",
    61: "food",
    62: "furniture",
    63: "furniture",
    64: "furniture",
    65: "furniture",
    67: "furniture",
    70: "furniture",
    72: "electronic",
    73: "electronic",
    74: "electronic",
    75: "electronic",
    76: "electronic",
    77: "electronic",
    78: "appliance",
    79: "appliance",
    80: "appliance",
    81: "appliance",
    82: "appliance",
    84: "indoor",
    85: "indoor",
    86: "indoor",
    87: "indoor",
    88: "indoor",
    89: "indoor",
    90: "indoor",
}
