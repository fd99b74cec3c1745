"""A small hand-written English lexicon (frequent words by part of speech) for the sentence grammar.

Rare and varied words come from the system dictionary (see :mod:`textgen`); these lists give the
grammar its frequent core, so that sentences read like English and common words recur often, as
they do in real text. Only lower-case letters and apostrophes appear.
"""

from __future__ import annotations

DETERMINERS = (
    "the the the the a a a this that every some no my your his her our their each another "
    "any one the same the other"
).split()

SUBJECT_PRONOUNS = "i you he she we they it".split()
OBJECT_PRONOUNS = "me you him her us them it".split()

FIRST_NAMES = (
    "alice anna arthur benjamin bob carol charles clara daniel david edward eleanor emily emma "
    "frank george grace hannah harry helen henry isabel jack james jane john joseph julia kate "
    "laura lily lucy margaret maria mark martha mary michael nancy oliver paul peter rachel "
    "richard robert rose ruth sam sarah simon sophie susan thomas tom victor walter william"
).split()

NOUNS = (
    "air animal answer apple arm army art baby back bag ball bank bed bird boat body book bottle "
    "box boy bread bridge brother building car card cat chair child church city class clock cloud "
    "coat coffee college color corner country course cup day desk dinner doctor dog door dream "
    "dress earth egg end engine evening eye face fact family farm father field fire fish floor "
    "flower food foot forest friend fruit game garden gate girl glass gold grass ground group "
    "hair hand head heart hill history horse hospital hotel hour house idea island job journey "
    "key king kitchen lake land language law leaf letter light line list lunch machine man map "
    "market meeting message minute money month moon morning mother mountain mouth music name "
    "nature neighbor news night noise nose number ocean office oil orange page paper park party "
    "path people person picture piece place plan plant plate pocket point police question radio "
    "rain reason river road rock room rule school sea season seat shape ship shirt shoe shop side "
    "sign silence sister size sky snow song sound space spring square star station stone storm "
    "story street student summer sun table tea teacher team thing thought time top town train "
    "tree truth voice wall war watch water wave way weather week wind window winter woman wood "
    "word work world year"
).split()

IRREGULAR_PLURALS = {
    "child": "children", "foot": "feet", "man": "men", "woman": "women", "person": "people",
    "mouse": "mice", "tooth": "teeth", "leaf": "leaves", "knife": "knives", "life": "lives",
}

ADJECTIVES = (
    "able afraid angry bad beautiful big bitter black blue bright broken brown busy calm careful "
    "cheap clean clear cold cool dark dead deep different dirty dry early easy empty fair famous "
    "fast fine flat free fresh full funny gentle golden good great green grey happy hard heavy "
    "high hot huge important kind large late lazy light little lonely long loud low lucky modern "
    "narrow near new nice old open orange pale perfect pink plain poor pretty proud public quick "
    "quiet rare ready real red rich right rough round sad safe sharp short silent simple slow "
    "small smooth soft special strange strong sudden sweet tall thick thin tired true ugly warm "
    "weak wet white whole wide wild wise wooden wrong yellow young"
).split()

ADVERBS = (
    "again almost already always carefully certainly clearly early easily finally gently "
    "happily here just later loudly never now often perhaps quickly quietly rarely really "
    "slowly sometimes soon still suddenly there today together tomorrow usually very well "
    "yesterday"
).split()

PREPOSITIONS = (
    "about above across after against along among around at before behind below beside "
    "between beyond by during for from in inside into near of off on outside over past through "
    "to toward under until with within without"
).split()

CONJUNCTIONS = "and but or so because while when although before after if".split()

MODALS = "can could will would should must might may".split()

# Verbs as base forms; True marks verbs that take an object in the grammar.
VERBS = {
    "accept": True, "add": True, "answer": True, "arrive": False, "ask": True, "bake": True,
    "begin": True, "believe": True, "break": True, "bring": True, "build": True, "buy": True,
    "call": True, "carry": True, "catch": True, "change": True, "choose": True, "clean": True,
    "climb": True, "close": True, "come": False, "cook": True, "count": True, "cover": True,
    "cross": True, "cry": False, "cut": True, "dance": False, "decide": False, "describe": True,
    "dig": True, "draw": True, "dream": False, "drink": True, "drive": True, "drop": True,
    "eat": True, "enjoy": True, "enter": True, "explain": True, "fall": False, "feel": True,
    "fill": True, "find": True, "finish": True, "fix": True, "fly": False, "follow": True,
    "forget": True, "forgive": True, "give": True, "go": False, "grow": True, "hate": True,
    "hear": True, "help": True, "hide": True, "hit": True, "hold": True, "hope": False,
    "hurry": False, "join": True, "jump": False, "keep": True, "kick": True, "kill": True,
    "know": True, "laugh": False, "learn": True, "leave": True, "lend": True, "lift": True,
    "like": True, "listen": False, "live": False, "lose": True, "love": True, "make": True,
    "meet": True, "miss": True, "move": True, "need": True, "open": True, "order": True,
    "paint": True, "pass": True, "pay": True, "pick": True, "plant": True, "play": True,
    "pull": True, "push": True, "reach": True, "read": True, "remember": True, "repair": True,
    "rest": False, "return": True, "ride": True, "ring": True, "rise": False, "run": False,
    "save": True, "say": True, "see": True, "sell": True, "send": True, "shake": True,
    "share": True, "shout": False, "show": True, "sing": True, "sit": False, "sleep": False,
    "smile": False, "speak": False, "spend": True, "stand": False, "start": True, "stay": False,
    "steal": True, "stop": True, "study": True, "swim": False, "take": True, "talk": False,
    "teach": True, "tell": True, "think": False, "throw": True, "touch": True, "travel": False,
    "try": True, "turn": True, "understand": True, "use": True, "visit": True, "wait": False,
    "walk": False, "want": True, "wash": True, "watch": True, "wear": True, "win": True,
    "wish": False, "wonder": False, "work": False, "write": True,
}

# base: (past, past participle)
IRREGULAR_VERBS = {
    "be": ("was", "been"), "begin": ("began", "begun"), "break": ("broke", "broken"),
    "bring": ("brought", "brought"), "build": ("built", "built"), "buy": ("bought", "bought"),
    "catch": ("caught", "caught"), "choose": ("chose", "chosen"), "come": ("came", "come"),
    "cut": ("cut", "cut"), "dig": ("dug", "dug"), "draw": ("drew", "drawn"),
    "drink": ("drank", "drunk"), "drive": ("drove", "driven"), "eat": ("ate", "eaten"),
    "fall": ("fell", "fallen"), "feel": ("felt", "felt"), "find": ("found", "found"),
    "fly": ("flew", "flown"), "forget": ("forgot", "forgotten"),
    "forgive": ("forgave", "forgiven"), "give": ("gave", "given"), "go": ("went", "gone"),
    "grow": ("grew", "grown"), "hear": ("heard", "heard"), "hide": ("hid", "hidden"),
    "hit": ("hit", "hit"), "hold": ("held", "held"), "keep": ("kept", "kept"),
    "know": ("knew", "known"), "leave": ("left", "left"), "lend": ("lent", "lent"),
    "lose": ("lost", "lost"), "make": ("made", "made"), "meet": ("met", "met"),
    "pay": ("paid", "paid"), "read": ("read", "read"), "ride": ("rode", "ridden"),
    "ring": ("rang", "rung"), "rise": ("rose", "risen"), "run": ("ran", "run"),
    "say": ("said", "said"), "see": ("saw", "seen"), "sell": ("sold", "sold"),
    "send": ("sent", "sent"), "shake": ("shook", "shaken"), "sing": ("sang", "sung"),
    "sit": ("sat", "sat"), "sleep": ("slept", "slept"), "speak": ("spoke", "spoken"),
    "spend": ("spent", "spent"), "stand": ("stood", "stood"), "steal": ("stole", "stolen"),
    "swim": ("swam", "swum"), "take": ("took", "taken"), "teach": ("taught", "taught"),
    "tell": ("told", "told"), "think": ("thought", "thought"), "throw": ("threw", "thrown"),
    "understand": ("understood", "understood"), "wear": ("wore", "worn"), "win": ("won", "won"),
    "write": ("wrote", "written"),
}

NUMBER_WORDS = (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety"
).split()

CONTRACTIONS = (
    "don't doesn't didn't can't couldn't won't wouldn't isn't wasn't aren't i'm you're we're "
    "they're it's that's there's i've we've they've i'll you'll she'll he'd we'd let's"
).split()

QUESTION_WORDS = "what where when why how who which".split()

INTERJECTIONS = "yes no well oh okay please thanks hello goodbye indeed".split()
