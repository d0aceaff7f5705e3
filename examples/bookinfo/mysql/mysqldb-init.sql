-- bookinfo's ratings database as Istio's mysqldb image holds it: `test.ratings`, one row per
-- reviewer; ratings v2 (DB_TYPE=mysql) reads Reviewer1's and Reviewer2's stars from it.
CREATE DATABASE test;
USE test;
CREATE TABLE `ratings` (
  `ReviewID` INT NOT NULL,
  `Rating` INT,
  PRIMARY KEY (`ReviewID`)
);
INSERT INTO ratings (ReviewID, Rating) VALUES (1, 5), (2, 4);
